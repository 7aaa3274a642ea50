from easel.cli import run

run()
