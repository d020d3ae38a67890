"""kuberl's runtime: the program inside an RLJob's pods (and behind `kuberl local`).

`config` and `contract` import no torch, so the operator can use them; everything else is the
RL loop and its engines.
"""

__version__ = "0.1.0"
