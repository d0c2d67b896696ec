"""Text data: corpora, token blocks, multiple-choice tasks and DataModules."""
