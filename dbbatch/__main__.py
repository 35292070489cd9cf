from dbbatch.cli import main

main()
