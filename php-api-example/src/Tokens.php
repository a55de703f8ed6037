<?php
// Signed, stateless login tokens.
//
// A token is base64url(json payload) . "." . base64url(HMAC-SHA256(secret, payload)).
// The payload binds the chat name to one ClientId, an expiry time and the origin of
// the page that logged in (used to check the Origin header when the token arrives as
// a cookie, see App::connect).

declare(strict_types=1);

namespace Ws2httpExample;

final class Tokens
{
    public function __construct(private string $secret, private int $ttlSeconds = 86400)
    {
    }

    /** Issues a token for $name on $clientId, issued to a page served from $origin. */
    public function issue(string $clientId, string $name, string $origin): string
    {
        $payload = json_encode([
            'c' => $clientId,
            'n' => $name,
            'o' => $origin,
            'e' => time() + $this->ttlSeconds,
        ], JSON_THROW_ON_ERROR | JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE);
        return self::b64($payload) . '.' . self::b64($this->mac($payload));
    }

    /**
     * Checks a token for $clientId. Returns its payload (keys c, n, o, e) or a string
     * that says why it was refused.
     *
     * @return array{c:string,n:string,o:string,e:int}|string
     */
    public function verify(string $token, string $clientId): array|string
    {
        $parts = explode('.', $token);
        if (count($parts) !== 2) {
            return 'malformed token';
        }
        $payload = self::unb64($parts[0]);
        $mac = self::unb64($parts[1]);
        if ($payload === null || $mac === null || !hash_equals($this->mac($payload), $mac)) {
            return 'bad token signature';
        }
        $data = json_decode($payload, true);
        if (!is_array($data) || !isset($data['c'], $data['n'], $data['o'], $data['e'])) {
            return 'malformed token';
        }
        if ((int) $data['e'] < time()) {
            return 'token expired';
        }
        if (!hash_equals((string) $data['c'], $clientId)) {
            return 'token is for another client id';
        }
        return [
            'c' => (string) $data['c'],
            'n' => (string) $data['n'],
            'o' => (string) $data['o'],
            'e' => (int) $data['e'],
        ];
    }

    private function mac(string $payload): string
    {
        return hash_hmac('sha256', $payload, $this->secret, true);
    }

    private static function b64(string $bytes): string
    {
        return rtrim(strtr(base64_encode($bytes), '+/', '-_'), '=');
    }

    private static function unb64(string $text): ?string
    {
        if ($text === '' || preg_match('/^[A-Za-z0-9_-]+$/', $text) !== 1) {
            return null;
        }
        $bytes = base64_decode(strtr($text, '-_', '+/'), true);
        return $bytes === false ? null : $bytes;
    }
}
