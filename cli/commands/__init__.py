"""One module per `ddk-cache` command: its flags and its output; the work is the stage it calls."""
