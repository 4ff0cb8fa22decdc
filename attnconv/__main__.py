from attnconv.cli import run

run()
