from w2sg.app.cli import main

main()
