<?php
// The example API: the four calls ws2http makes, a login for the demo page, and the
// demo page's static files. Independent of the server that runs it: router.php adapts
// PHP's built-in server, worker.php adapts RoadRunner (PSR-7).
//
//   GET    /<ClientId>?token=…  connect: "ok" lets the websocket open, anything else
//                               refuses it (ws2http answers the client with an error)
//   POST   /<ClientId>          a websocket message; the response body is the reply
//   DELETE /<ClientId>          the websocket closed; body = close reason
//   POST   /auth/login          demo login: {name} -> {token, clientId, name}; the ClientId
//                               is chosen here, never by the caller
//   GET    /  and /static/…     the demo page
//
// A ClientId is one path segment of [A-Za-z0-9_-]{1,64}, so it never collides with the
// page's own paths. With WS2HTTP_API_TOKEN set (the gateway's --api-token), the three calls
// on /<ClientId> are only taken from a caller that sends it as X-Ws2http-Token: the
// gateways, not a browser that found the app's port.

declare(strict_types=1);

namespace Ws2httpExample;

final class App
{
    public const COOKIE = 'ws2http_token';
    private const CLIENT_ID = '/^[A-Za-z0-9_-]{1,64}$/';
    /** A member this young may still be connecting: its socket opens after our `ok`. */
    private const JOIN_GRACE_SECONDS = 60;

    private ?Store $store = null;

    /**
     * @param string        $dbPath         SQLite file for membership and the token secret
     * @param list<string>  $allowedOrigins extra origins allowed to use the cookie
     * @param string|null   $apiToken       the gateways' --api-token, required on the calls
     */
    public function __construct(
        private string $dbPath,
        private Gateway $gateway,
        private string $publicDir,
        private ?string $secret = null,
        private array $allowedOrigins = [],
        private ?string $apiToken = null,
    ) {
    }

    /** Builds the app from WS2HTTP_* environment variables (see README.md). */
    public static function fromEnv(): self
    {
        $env = static fn (string $k, string $d = ''): string => (string) (getenv($k) ?: $d);
        $origins = array_values(array_filter(array_map('trim', explode(',', $env('WS2HTTP_ALLOWED_ORIGINS')))));
        return new self(
            // Not the shared temp dir: the file holds the token secret (Store makes it 0600).
            $env('WS2HTTP_DB', dirname(__DIR__) . '/var/chat.sqlite'),
            new Gateway(
                $env('WS2HTTP_PUSH_URL', 'http://127.0.0.1:7002/'),
                $env('WS2HTTP_CONTROL_TOKEN') ?: null,
            ),
            dirname(__DIR__) . '/public',
            $env('WS2HTTP_SECRET') ?: null,
            $origins,
            $env('WS2HTTP_API_TOKEN') ?: null,
        );
    }

    public function handle(Request $req): Response
    {
        try {
            return $this->route($req);
        } catch (\Throwable $e) {
            error_log('ws2http example: ' . $e);
            return new Response(500, 'internal error');
        }
    }

    private function route(Request $req): Response
    {
        $path = $req->path;
        if ($path === '/auth/login') {
            return $req->method === 'POST' ? $this->login($req) : new Response(405, 'use POST');
        }
        if ($path === '/' || $path === '/index.html' || str_starts_with($path, '/static/')) {
            return $this->staticFile($path);
        }
        if ($path === '/healthz') {
            return new Response(200, 'ok');
        }
        $clientId = rawurldecode(substr($path, 1));
        if (preg_match(self::CLIENT_ID, $clientId) !== 1) {
            return new Response(404, 'not found');
        }
        if ($this->apiToken !== null && !hash_equals($this->apiToken, $req->header('x-ws2http-token'))) {
            return new Response(401, 'unauthorized: only the gateway makes these calls');
        }
        return match ($req->method) {
            'GET' => $this->connect($req, $clientId),
            'POST' => $this->message($req, $clientId),
            'DELETE' => $this->disconnect($req, $clientId),
            default => new Response(405, 'method not allowed'),
        };
    }

    // ---- the four calls -------------------------------------------------------

    /**
     * Connect. ws2http forwards the client's query string and its Cookie, Origin,
     * Authorization and User-Agent headers. The token comes from ?token= or, failing
     * that, from the ws2http_token cookie. A cookie is sent by the browser on its own,
     * so then the Origin must be there and be the page that logged in (or listed in
     * WS2HTTP_ALLOWED_ORIGINS): that stops another site from opening a websocket with
     * the user's cookie (cross-site websocket hijacking). Browsers always send Origin on
     * a websocket; other clients use ?token=.
     */
    private function connect(Request $req, string $clientId): Response
    {
        $fromCookie = false;
        $token = self::str($req->query['token'] ?? '');
        if ($token === '') {
            $token = self::str($req->cookies[self::COOKIE] ?? '');
            $fromCookie = $token !== '';
        }
        if ($token === '') {
            return new Response(401, 'unauthorized: no token (use ?token= or the ' . self::COOKIE . ' cookie)');
        }
        $claims = $this->tokens()->verify($token, $clientId);
        if (is_string($claims)) {
            return new Response(401, 'unauthorized: ' . $claims);
        }
        $origin = $req->header('origin');
        if ($fromCookie && $origin === '') {
            return new Response(403, 'forbidden: the cookie is taken only with an Origin (or use ?token=)');
        }
        if ($fromCookie && $origin !== $claims['o'] && !in_array($origin, $this->allowedOrigins, true)) {
            return new Response(403, 'forbidden: origin ' . $origin . ' may not use the cookie');
        }

        $store = $this->store();
        $store->join($clientId, $claims['n'], $req->header('x-connection-id'));
        // The new socket opens only after this response, so pushes to it would miss;
        // the others are connected already and hear about the newcomer now.
        $this->broadcast($clientId, ['type' => 'joined', 'name' => $claims['n']]);
        return new Response(200, 'ok');
    }

    /**
     * A message from the websocket of $clientId. JSON {"type":"say","text":…} (or
     * plain text) is pushed to every other member; {"type":"who"} lists the members.
     * The response body goes back to the sender as a websocket message. A say may carry
     * an "id" of the client's choosing (an integer, or a string of up to 64 bytes): the
     * answer to it, "sent" or "error", carries it back, so that the client knows which of
     * its texts the API has answered.
     */
    private function message(Request $req, string $clientId): Response
    {
        $msg = json_decode($req->body, true);
        if (!is_array($msg)) {
            $msg = ['type' => 'say', 'text' => $req->body];
        }
        $id = $msg['id'] ?? null;
        $echo = is_int($id) || (is_string($id) && strlen($id) <= 64) ? ['id' => $id] : [];
        $me = $this->store()->member($clientId);
        if ($me === null) {
            // Its socket is open, but the room dropped it: a push found no socket for it
            // (after a cluster node came back, its pushes go to a node that does not hold
            // it; see broadcast()), or a DELETE for it came late. A new connection joins
            // again, so the page reconnects on "reconnect"; "unsent" (and the say's "id")
            // names the refused text, to be sent again once back.
            $refused = ['type' => 'error', 'text' => 'not in the chat: reconnect', 'reconnect' => true];
            if (self::str($msg['type'] ?? '') === 'say') {
                $refused['unsent'] = self::clean(self::str($msg['text'] ?? ''), 2000);
                $refused += $echo;
            }
            return self::json($refused);
        }
        switch (self::str($msg['type'] ?? '')) {
            case 'say':
                $text = self::clean(self::str($msg['text'] ?? ''), 2000);
                if ($text === '') {
                    return self::json(['type' => 'error', 'text' => 'empty message'] + $echo);
                }
                $delivered = $this->broadcast($clientId, [
                    'type' => 'message',
                    'from' => $me['name'],
                    'text' => $text,
                    'time' => time(),
                ]);
                return self::json(
                    ['type' => 'sent', 'text' => $text, 'delivered' => $delivered, 'time' => time()] + $echo
                );
            case 'who':
                return self::json([
                    'type' => 'members',
                    'you' => $me['name'],
                    'members' => array_map(static fn (array $m): string => $m['name'], $this->store()->others($clientId)),
                ]);
            default:
                return self::json(['type' => 'error', 'text' => 'unknown message type']);
        }
    }

    /**
     * The websocket of $clientId closed (body = close reason, X-Close-Code = code;
     * reason "EOF" when the TCP connection dropped). Tells the others.
     */
    private function disconnect(Request $req, string $clientId): Response
    {
        $gone = $this->store()->leave($clientId, $req->header('x-connection-id'));
        if ($gone !== null) {
            $this->broadcast($clientId, [
                'type' => 'left',
                'name' => $gone['name'],
                'reason' => self::clean($req->body, 200),
                'code' => (int) $req->header('x-close-code'),
            ]);
        }
        return new Response(200, '');
    }

    /**
     * Pushes $event to every member but $except through the gateway's control API and
     * returns how many took it. A member the gateway does not know (404) has gone
     * without us hearing of it yet, so it is dropped from the room, unless it joined in
     * the last minute: its socket opens only once its connect call has answered `ok`, and
     * a push racing that answer finds no socket yet.
     *
     * @param array<string,mixed> $event
     */
    private function broadcast(string $except, array $event): int
    {
        $body = json_encode($event, JSON_THROW_ON_ERROR | JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE);
        $delivered = 0;
        foreach ($this->store()->others($except) as $member) {
            $status = $this->gateway->push($member['client_id'], $body);
            if ($status === 200) {
                $delivered++;
            } elseif ($status === 404 && (int) $member['joined_at'] < time() - self::JOIN_GRACE_SECONDS) {
                // That very connection only: a newer one of the same ClientId stays.
                $this->store()->leave($member['client_id'], $member['connection_id']);
            } elseif ($status !== 404) {
                error_log("ws2http example: push to {$member['client_id']} failed with status $status");
            }
        }
        return $delivered;
    }

    // ---- the demo page ----------------------------------------------------------

    /**
     * POST /auth/login {"name":…} (JSON or form): a token for the page, for a ClientId
     * chosen here. A caller that could choose its ClientId could take over another
     * member's socket (the gateway replaces an older connection of the same ClientId).
     */
    private function login(Request $req): Response
    {
        $in = json_decode($req->body, true);
        if (!is_array($in)) {
            parse_str($req->body, $in);
        }
        $name = self::clean(self::str($in['name'] ?? ''), 32);
        if ($name === '') {
            return self::json(['error' => 'pick a name'], 400);
        }
        $clientId = bin2hex(random_bytes(12));
        $scheme = $req->header('x-forwarded-proto') ?: 'http';
        $origin = $req->header('origin') ?: $scheme . '://' . $req->header('host');
        $token = $this->tokens()->issue($clientId, $name, $origin);
        $cookie = self::COOKIE . '=' . $token . '; Path=/; Max-Age=86400; HttpOnly; SameSite=Strict';
        if ($scheme === 'https') {
            // Served over TLS (the proxy in front says so): never sent over plain ws:// or http://.
            $cookie .= '; Secure';
        }
        return self::json(['clientId' => $clientId, 'name' => $name, 'token' => $token], 200, ['Set-Cookie' => $cookie]);
    }

    private function staticFile(string $path): Response
    {
        $file = $path === '/' || $path === '/index.html' ? 'index.html' : substr($path, strlen('/static/'));
        if (preg_match('/^[A-Za-z0-9_-]+\.(html|js|css|svg)$/', $file, $m) !== 1
            || !is_file($this->publicDir . '/' . $file)) {
            return new Response(404, 'not found');
        }
        $types = ['html' => 'text/html', 'js' => 'text/javascript', 'css' => 'text/css', 'svg' => 'image/svg+xml'];
        return new Response(200, (string) file_get_contents($this->publicDir . '/' . $file), [
            'Content-Type' => $types[$m[1]] . '; charset=utf-8',
            'Cache-Control' => 'no-cache',
        ]);
    }

    // ---- helpers ----------------------------------------------------------------

    private function store(): Store
    {
        return $this->store ??= new Store($this->dbPath);
    }

    private function tokens(): Tokens
    {
        return new Tokens($this->secret ?? $this->store()->secret());
    }

    /** A request value as a string; arrays and objects (e.g. `?token[]=`) become "". */
    private static function str(mixed $value): string
    {
        return is_scalar($value) ? (string) $value : '';
    }

    /** Trims, drops control characters and invalid UTF-8, caps the length. */
    private static function clean(string $text, int $max): string
    {
        if (preg_match('//u', $text) !== 1) {
            // invalid bytes become U+FFFD
            $text = htmlspecialchars_decode(htmlspecialchars($text, ENT_SUBSTITUTE | ENT_NOQUOTES, 'UTF-8'), ENT_NOQUOTES);
        }
        $text = trim((string) preg_replace('/[\x00-\x1F\x7F]+/u', ' ', $text));
        preg_match('/^.{0,' . $max . '}/us', $text, $m);
        return $m[0] ?? '';
    }

    /**
     * @param array<string,mixed>  $data
     * @param array<string,string> $headers
     */
    private static function json(array $data, int $status = 200, array $headers = []): Response
    {
        $body = json_encode($data, JSON_THROW_ON_ERROR | JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE);
        return new Response($status, $body, ['Content-Type' => 'application/json'] + $headers);
    }
}
