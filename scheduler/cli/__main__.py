from scheduler.cli.root import main

main()
