"""Speedrun records: folders of logs plus the script that produced them, and the tools to
create, check (statistics), compare, plot and reproduce them. Run `python -m records --help`."""
