"""What every stage shares: the job it is given, its declaration, writing outputs atomically, errors, hashes."""
