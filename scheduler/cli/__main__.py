from scheduler.cli.root import console_main

console_main()
