from substituter.cli import main

main()
