"""Hardware profiles (YAML), their loader/validator, and calibration. Arrives with the simulator issue."""
