from aptguard.cli import main

main()
