from ctformat_cli.main import main

main()
