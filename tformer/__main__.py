from tformer.cli import main

main()
