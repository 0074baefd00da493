"""Results of a demo (or any set of runs) as a table and as pictures."""
