from kms.cli import main

main()
