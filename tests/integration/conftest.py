"""Integration tests run against a real local control plane.

The fixtures (`k8s_cluster`, `kube_api`, `namespace`) and `wait_for` come from
`kuberl_operator.devcluster.pytest_plugin`, which the repository's root conftest.py loads
(pytest accepts `pytest_plugins` only there).
"""
