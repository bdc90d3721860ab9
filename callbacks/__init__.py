"""Lightning callbacks of marble-pl, installed as ``marble_pl.callbacks``."""
