"""Seed statistics for a record claim: mean, sample std and one-sided t-tests, with no scipy.

The challenge asks a new record to beat the previous one by at least 0.005 nats at p < 0.01, usually over 3
seeds; maintainers used a one-sided Welch t-test. Here H1 is "our mean < reference - min_improvement" (lower
is better):
- against a single reference value, that value is treated as a known mean: one-sample t, n - 1 dof;
- against a second group of runs, Welch's t with Welch-Satterthwaite degrees of freedom.
The t CDF comes from the regularized incomplete beta function (continued fraction, Numerical Recipes 6.4).
"""

import math

BETA_MAX_ITERATIONS = 300
BETA_EPSILON = 3e-16


def beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Lentz's evaluation of the continued fraction of I_x(a, b) (converges fast for x < (a+1)/(a+b+2))."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, BETA_MAX_ITERATIONS + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= d * c
        if abs(d * c - 1.0) < BETA_EPSILON:
            return fraction
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t with `dof` (possibly fractional) degrees of freedom."""
    if dof <= 0:
        raise ValueError(f"dof must be > 0, got {dof}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * regularized_incomplete_beta(dof / 2.0, 0.5, dof / (dof + t * t))
    return tail if t < 0 else 1.0 - tail


def mean_and_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for a single value."""
    n = len(values)
    if n == 0:
        raise ValueError("values must not be empty")
    mean = sum(values) / n
    if n == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def one_sample_t_test(values: list[float], reference: float, min_improvement: float = 0.0) -> dict:
    """One-sided test of mean(values) < reference - min_improvement, the reference taken as a known mean."""
    mean, std = mean_and_std(values)
    result = {"test": "one-sample t (reference as known mean)", "n": len(values), "mean": mean, "std": std,
              "threshold": reference - min_improvement, "t": None, "dof": None, "p_value": None}
    if std is None:
        return result
    result["dof"] = len(values) - 1
    if std == 0:  # t is infinite; the test is decided by which side of the threshold the mean lies
        result["p_value"] = 0.0 if mean < result["threshold"] else 1.0
        return result
    result["t"] = (mean - result["threshold"]) / (std / math.sqrt(len(values)))
    result["p_value"] = student_t_cdf(result["t"], result["dof"])
    return result


def welch_t_test(values: list[float], reference_values: list[float], min_improvement: float = 0.0) -> dict:
    """One-sided Welch test of mean(values) < mean(reference_values) - min_improvement."""
    mean, std = mean_and_std(values)
    reference_mean, reference_std = mean_and_std(reference_values)
    threshold = reference_mean - min_improvement
    result = {"test": "Welch t", "n": len(values), "mean": mean, "std": std,
              "reference_n": len(reference_values), "reference_mean": reference_mean,
              "reference_std": reference_std, "threshold": threshold,
              "t": None, "dof": None, "p_value": None}
    if std is None or reference_std is None:
        return result
    var_mean = std**2 / len(values)
    reference_var_mean = reference_std**2 / len(reference_values)
    standard_error = math.sqrt(var_mean + reference_var_mean)
    if standard_error == 0:  # t is infinite (kept None: JSON has no infinity)
        result["p_value"] = 0.0 if mean < threshold else 1.0
        return result
    result["t"] = (mean - threshold) / standard_error
    result["dof"] = (var_mean + reference_var_mean) ** 2 / (
        var_mean**2 / (len(values) - 1) + reference_var_mean**2 / (len(reference_values) - 1))
    result["p_value"] = student_t_cdf(result["t"], result["dof"])
    return result
