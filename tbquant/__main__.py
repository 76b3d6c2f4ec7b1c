"""`python -m tbquant` runs the command line (also under `accelerate launch -m tbquant`)."""

from tbquant.cli.main import main

main()
