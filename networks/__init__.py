"""Other papers' networks, one file per network, reproduced from their official code (keys, outputs, checkpoints).

Perceive-IR's own network is `backbone.py` (Restormer with the ETB hook) plus `guidance.py`. The networks here
are what the paper compares with or builds on:
- Table XV, backbones that take Perceive-IR's guidance: `nafnet.py`, `xrestormer.py`, `grl.py`.
- Table XIV, restorers behind stage 1's medium-quality images, and PromptIR, the all-in-one baseline:
  `promptir.py`, `mprnet.py`, `airnet.py` (plain networks, no guidance hook).
Each file imports its shared pieces from `backbone.py` only, builds its released configurations by name
(`CONFIGS`), loads released checkpoints (`load_official`) and runs a self-check: `python -m networks.grl`.
"""
