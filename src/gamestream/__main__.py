from gamestream.cli import main

main()
