<?php
// Chat membership kept in SQLite, so it is shared by every PHP process that serves
// the API: `php -S` with PHP_CLI_SERVER_WORKERS, php-fpm children, RoadRunner
// workers. WAL mode plus a busy timeout lets concurrent requests wait for each other
// instead of failing with "database is locked"; a read that leads to a write takes the
// write lock first (BEGIN IMMEDIATE), since a read snapshot another worker has written
// past cannot wait its way into a write. The file holds the token secret: it is
// readable by its owner only.

declare(strict_types=1);

namespace Ws2httpExample;

use PDO;

final class Store
{
    private PDO $db;

    public function __construct(string $path)
    {
        self::createPrivate($path);
        // A new database is set up (WAL switch, tables) by one worker at a time: workers
        // that opened the new file while another was setting it up were told "file is not a
        // database" or "database disk image is malformed". `$path.setup-lock` is locked for
        // it and then says "set up": from then on no worker takes the lock.
        $marker = $path . '.setup-lock';
        $setup = @file_get_contents($marker) === self::SET_UP ? null : self::setupLock($marker);
        try {
            $this->open($path);
            if ($setup !== null) {
                ftruncate($setup, 0);
                fwrite($setup, self::SET_UP);
                fflush($setup);
            }
        } finally {
            if ($setup !== null) {
                flock($setup, LOCK_UN);
                fclose($setup);
            }
        }
    }

    /** What `$path.setup-lock` holds once the database is set up. */
    private const SET_UP = "set up\n";

    /** An exclusive lock on the file `$marker`, held while the database is set up. */
    private static function setupLock(string $marker)
    {
        $lock = @fopen($marker, 'c');
        if ($lock === false || !flock($lock, LOCK_EX)) {
            throw new \RuntimeException("WS2HTTP_DB: cannot lock $marker");
        }
        return $lock;
    }

    private function open(string $path): void
    {
        $this->db = new PDO('sqlite:' . $path, null, null, [
            PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION,
            PDO::ATTR_DEFAULT_FETCH_MODE => PDO::FETCH_ASSOC,
        ]);
        $this->db->exec('PRAGMA busy_timeout = 10000');
        self::useWal($this->db);
        $this->db->exec('PRAGMA synchronous = NORMAL');
        // Every request of `php -S` or php-fpm opens the store: once the tables are there, no
        // lock is taken for them.
        $tables = $this->db->query(
            'SELECT count(*) FROM sqlite_master WHERE type = \'table\' AND name IN (\'members\', \'settings\')'
        )->fetchColumn();
        if ((int) $tables === 2) {
            return;
        }
        // The write lock first, waited for like any write: a schema read before another
        // worker's write could not upgrade itself into one.
        $this->db->exec('BEGIN IMMEDIATE');
        try {
            $this->db->exec(
                'CREATE TABLE IF NOT EXISTS members (
                    client_id     TEXT PRIMARY KEY,
                    name          TEXT NOT NULL,
                    connection_id TEXT NOT NULL DEFAULT \'\',
                    joined_at     INTEGER NOT NULL
                )'
            );
            $this->db->exec('CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)');
            $this->db->exec('COMMIT');
        } catch (\Throwable $e) {
            $this->db->exec('ROLLBACK');
            throw $e;
        }
    }

    /**
     * Puts the database in WAL mode (kept in the file: only a new database's first openers
     * switch it). The switch needs the database to itself, and SQLite answers "database is
     * locked" at once, without waiting out the busy timeout, when other workers opening the
     * new file at the same moment hold it; and a worker that reads the new file's first page
     * while another is writing it is told "file is not a database": so it is tried again for
     * up to 10 s (a file that is truly no database still fails then).
     */
    private static function useWal(PDO $db): void
    {
        $deadline = microtime(true) + 10.0;
        while (true) {
            try {
                $mode = $db->query('PRAGMA journal_mode = WAL')->fetchColumn();
                if (strtolower((string) $mode) === 'wal') {
                    return;
                }
            } catch (\PDOException $e) {
                $passing = str_contains($e->getMessage(), 'locked')
                    || str_contains($e->getMessage(), 'not a database');
                if (!$passing || microtime(true) > $deadline) {
                    throw $e;
                }
            }
            if (microtime(true) > $deadline) {
                throw new \RuntimeException('WS2HTTP_DB: the database would not switch to WAL mode');
            }
            usleep(10000);
        }
    }

    /**
     * Creates $path (and its directory) readable by this user only, or makes an existing
     * file so; SQLite gives its -wal and -shm files the same mode. Fails if the file is
     * someone else's: they could read the secret, or have chosen it.
     */
    private static function createPrivate(string $path): void
    {
        $dir = dirname($path);
        if (!is_dir($dir) && !@mkdir($dir, 0700, true) && !is_dir($dir)) {
            throw new \RuntimeException("WS2HTTP_DB: cannot create the directory $dir");
        }
        $old = umask(0077);
        try {
            if (!file_exists($path) && !@touch($path)) {
                throw new \RuntimeException("WS2HTTP_DB: cannot create $path");
            }
        } finally {
            umask($old);
        }
        if (!@chmod($path, 0600)) {
            throw new \RuntimeException("WS2HTTP_DB: $path is not this user's file (cannot make it private)");
        }
    }

    /**
     * The secret that signs login tokens. Made once at random and kept in the
     * database, so every worker and every restart agrees on it.
     */
    public function secret(): string
    {
        $get = $this->db->prepare('SELECT value FROM settings WHERE key = \'secret\'');
        $get->execute();
        $value = $get->fetchColumn();
        if ($value === false) {
            $this->db->prepare('INSERT OR IGNORE INTO settings (key, value) VALUES (\'secret\', ?)')
                ->execute([bin2hex(random_bytes(32))]);
            $get->execute();
            $value = $get->fetchColumn();
        }
        return (string) $value;
    }

    /**
     * Records that $clientId is connected as $name, replacing an older connection. Two
     * connects of one ClientId can reach the API in either order (two tabs opening at
     * once); the gateway keeps the newer connection, so the row does too: of two
     * X-Connection-Ids from one gateway process (the same first 6 hex digits) the greater
     * is the newer. Ids from different gateways cannot be ordered: the later call wins.
     */
    public function join(string $clientId, string $name, string $connectionId): void
    {
        $this->db->prepare(
            'INSERT INTO members (client_id, name, connection_id, joined_at) VALUES (?, ?, ?, ?)
             ON CONFLICT (client_id) DO UPDATE SET
                 name = excluded.name, connection_id = excluded.connection_id, joined_at = excluded.joined_at
             WHERE NOT (length(members.connection_id) = 16 AND length(excluded.connection_id) = 16
                 AND substr(members.connection_id, 1, 6) = substr(excluded.connection_id, 1, 6)
                 AND members.connection_id > excluded.connection_id)'
        )->execute([$clientId, $name, $connectionId, time()]);
    }

    /** @return array{client_id:string,name:string,connection_id:string}|null */
    public function member(string $clientId): ?array
    {
        $q = $this->db->prepare('SELECT client_id, name, connection_id FROM members WHERE client_id = ?');
        $q->execute([$clientId]);
        $row = $q->fetch();
        return $row === false ? null : $row;
    }

    /**
     * Removes $clientId and returns the removed row. When $connectionId is given, only
     * that connection is removed: a late DELETE for a socket that has since been
     * replaced (the client reconnected, maybe through another gateway) is ignored.
     *
     * @return array{client_id:string,name:string,connection_id:string}|null
     */
    public function leave(string $clientId, string $connectionId = ''): ?array
    {
        // The write lock before the read: between a deferred transaction's SELECT and its
        // DELETE another worker may commit, and SQLite then refuses the DELETE at once
        // ("database is locked"), busy timeout or not.
        $this->db->exec('BEGIN IMMEDIATE');
        try {
            $row = $this->member($clientId);
            if ($row !== null && ($connectionId === '' || $row['connection_id'] === ''
                || $row['connection_id'] === $connectionId)) {
                $this->db->prepare('DELETE FROM members WHERE client_id = ?')->execute([$clientId]);
            } else {
                $row = null;
            }
            $this->db->exec('COMMIT');
        } catch (\Throwable $e) {
            try {
                $this->db->exec('ROLLBACK');
            } catch (\Throwable) {
                // no transaction left to end: the error above says what happened
            }
            throw $e;
        }
        return $row;
    }

    /**
     * Every member except $clientId, oldest first.
     *
     * @return list<array{client_id:string,name:string,connection_id:string,joined_at:int}>
     */
    public function others(string $clientId): array
    {
        $q = $this->db->prepare(
            'SELECT client_id, name, connection_id, joined_at FROM members WHERE client_id <> ?'
            . ' ORDER BY joined_at, client_id'
        );
        $q->execute([$clientId]);
        return $q->fetchAll();
    }
}
