from w2sg.cli import main

main()
