from flickd.cli.main import main

main()
