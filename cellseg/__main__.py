from cellseg.cli.main import main

main()
