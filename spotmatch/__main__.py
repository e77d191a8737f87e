from spotmatch.cli import main

main()
