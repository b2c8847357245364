"""Hardware profiles: the shipped YAML files (data/) and their loader/validator. Data only:
`infinisim calibrate` (executor/calibrate.py) measures this machine and writes one."""
