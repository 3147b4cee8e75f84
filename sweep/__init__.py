"""`musk sweep`: a grid of `musk train` runs planned, placed and watched. Launches training only as a
command line (`musk train ...`); of train/ it reads only the config types it checks (train.config)."""
