from tfharness.cli import main

main()
