"""kwok Stage files the dev cluster loads (a package so that wheels ship the YAML)."""
