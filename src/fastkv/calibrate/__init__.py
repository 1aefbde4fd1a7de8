"""Per-model calibration of FastKV's settings (`fastkv calibrate`) and the profiles it writes."""
