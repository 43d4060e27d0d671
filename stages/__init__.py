"""CLI stages: each module parses its flags, calls pgolf, and writes outputs + a manifest. Installed as pgolf.stages."""
