from medkd.cli import app

app(prog_name="medkd")
