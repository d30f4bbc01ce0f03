from meddiag.cli import app

app(prog_name="meddiag")
