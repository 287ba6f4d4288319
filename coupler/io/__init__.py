"""File I/O of lodas: every output is written to a temporary name and renamed when complete."""
