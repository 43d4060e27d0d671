"""Process-group teardown under torchrun: after finish_distributed no gloo thread may outlive the group, or a worker
finishing a collective during interpreter shutdown aborts the rank (SIGABRT) after a run that otherwise succeeded."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# torch._dynamo imported after the group starts (as the first torch.compile or a quantized model's load does) is what
# kept it alive; the all_reduce gives its worker threads something to have finished.
RANK_SCRIPT = """
import os
import sys
from pathlib import Path
import torch
import torch.distributed as dist
from pgolf.dist import finish_distributed, init_distributed
init_distributed("cpu")
import torch._dynamo  # noqa: F401
tensor = torch.ones(3)
dist.all_reduce(tensor)
finish_distributed()
names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
gloo = [n for n in names if "gloo" in n]
Path(sys.argv[1], f"rank{os.environ['RANK']}").write_text(f"sum {tensor[0].item():g} gloo threads {gloo}")
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to list the process's threads")
def test_finish_distributed_leaves_no_gloo_thread_behind(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run([*torchrun, script, tmp_path], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}").read_text() == "sum 2 gloo threads []", rank
