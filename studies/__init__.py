"""The reproduction studies of reproduce.py: plan (study definitions, runs), run (process pool,
record store), report (statistics, Markdown), plot (figure)."""
