from gamestream.cli import main

# guarded: `serve --workers` spawns its workers with multiprocessing's spawn method, which imports the main module
if __name__ == "__main__":
    main()
