from w2sg.app.entry import main

main()
