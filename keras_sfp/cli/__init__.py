"""The command-line programs: `keras-sfp-train` and `keras-sfp-export`."""
