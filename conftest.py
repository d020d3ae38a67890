pytest_plugins = ["kuberl_operator.devcluster.pytest_plugin"]
