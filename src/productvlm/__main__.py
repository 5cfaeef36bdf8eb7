from productvlm.cli import main

main()
