<?php
// Chat membership kept in SQLite, so it is shared by every PHP process that serves
// the API: `php -S` with PHP_CLI_SERVER_WORKERS, php-fpm children, RoadRunner
// workers. WAL mode plus a busy timeout lets concurrent requests wait for each other
// instead of failing with "database is locked".

declare(strict_types=1);

namespace Ws2httpExample;

use PDO;

final class Store
{
    private PDO $db;

    public function __construct(string $path)
    {
        $this->db = new PDO('sqlite:' . $path, null, null, [
            PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION,
            PDO::ATTR_DEFAULT_FETCH_MODE => PDO::FETCH_ASSOC,
        ]);
        $this->db->exec('PRAGMA busy_timeout = 10000');
        $this->db->exec('PRAGMA journal_mode = WAL');
        $this->db->exec('PRAGMA synchronous = NORMAL');
        $this->db->exec(
            'CREATE TABLE IF NOT EXISTS members (
                client_id     TEXT PRIMARY KEY,
                name          TEXT NOT NULL,
                connection_id TEXT NOT NULL DEFAULT \'\',
                joined_at     INTEGER NOT NULL
            )'
        );
        $this->db->exec('CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)');
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

    /** Records that $clientId is connected as $name (replacing an older connection). */
    public function join(string $clientId, string $name, string $connectionId): void
    {
        $this->db->prepare(
            'INSERT OR REPLACE INTO members (client_id, name, connection_id, joined_at) VALUES (?, ?, ?, ?)'
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
        $this->db->beginTransaction();
        try {
            $row = $this->member($clientId);
            if ($row !== null && ($connectionId === '' || $row['connection_id'] === ''
                || $row['connection_id'] === $connectionId)) {
                $this->db->prepare('DELETE FROM members WHERE client_id = ?')->execute([$clientId]);
            } else {
                $row = null;
            }
            $this->db->commit();
        } catch (\Throwable $e) {
            $this->db->rollBack();
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
