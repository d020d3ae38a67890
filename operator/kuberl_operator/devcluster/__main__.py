"""``python -m kuberl_operator.devcluster up|down|status|build``."""

from .cli import dev_cluster

if __name__ == "__main__":
    dev_cluster(prog_name="python -m kuberl_operator.devcluster")
