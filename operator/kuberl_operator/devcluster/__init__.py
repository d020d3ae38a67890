"""A local Kubernetes control plane with kwok-simulated GPU nodes.

Used by the integration/e2e tests and by `kuberl dev-cluster`.

``build`` compiles etcd, kube-apiserver, kube-scheduler, kube-controller-manager, kubectl, kwok and
helm from the Go module proxy into a cache; ``cluster.LocalCluster`` runs them on 127.0.0.1.
"""
