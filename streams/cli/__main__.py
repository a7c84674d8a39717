from ctxflow.streams.cli.main import main

main()
