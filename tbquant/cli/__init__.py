"""Command-line interface (`tbquant ...`)."""
