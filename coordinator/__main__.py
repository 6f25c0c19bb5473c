from .cli import run

if __name__ == "__main__":  # guard: multiprocessing's spawn re-imports the parent's __main__
    run()
