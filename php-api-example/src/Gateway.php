<?php
// Client for ws2http's control API: push a message to a ClientId's websocket, or
// close it.
//
// The base URL is the gateway's control listener (`--control-listen`, default
// 127.0.0.1:7002). With several gateways it is the hashing proxy's internal frontend
// instead (see haproxy/ and nginx/ in this repository): the proxy hashes the first path
// segment, the ClientId, exactly as it does for the public websocket frontend, so the
// push lands on the node that holds the socket. The API never needs to know which
// node that is.
//
// Uses PHP's http stream wrapper, so no extension beyond the defaults is needed.

declare(strict_types=1);

namespace Ws2httpExample;

final class Gateway
{
    private string $base;

    /**
     * @param string      $pushBase e.g. "http://127.0.0.1:7002/"
     * @param string|null $token    sent as "Authorization: Bearer …" when the gateway
     *                              runs with --control-token
     */
    public function __construct(string $pushBase, private ?string $token = null, private float $timeout = 5.0)
    {
        $this->base = rtrim($pushBase, '/') . '/';
    }

    /**
     * Sends $message to the websocket of $clientId. Returns the HTTP status: 200 when
     * the gateway took it, 404 when no socket has that ClientId, 0 when the gateway
     * could not be reached.
     */
    public function push(string $clientId, string $message): int
    {
        return $this->request('POST', rawurlencode($clientId), $message);
    }

    /** Asks the gateway to close the websocket of $clientId with $code and $reason. */
    public function close(string $clientId, int $code = 1000, string $reason = ''): int
    {
        $query = http_build_query(['code' => $code, 'reason' => $reason]);
        return $this->request('DELETE', rawurlencode($clientId) . '?' . $query, '');
    }

    private function request(string $method, string $pathAndQuery, string $body): int
    {
        $headers = ['Content-Type: text/plain; charset=utf-8', 'Connection: close'];
        if ($this->token !== null && $this->token !== '') {
            $headers[] = 'Authorization: Bearer ' . $this->token;
        }
        $context = stream_context_create(['http' => [
            'method' => $method,
            'header' => implode("\r\n", $headers),
            'content' => $body,
            'timeout' => $this->timeout,
            'ignore_errors' => true, // give us the body and status of 4xx/5xx too
            'follow_location' => 0,
        ]]);
        // The status line from the stream's metadata: `$http_response_header`, filled in
        // by file_get_contents, is deprecated from PHP 8.5 on, and a deprecation notice
        // shown in the answer would spoil the API's `ok` to the gateway.
        $stream = @fopen($this->base . $pathAndQuery, 'r', false, $context);
        if ($stream === false) {
            return 0;
        }
        $status = stream_get_meta_data($stream)['wrapper_data'][0] ?? '';
        fclose($stream); // the answer's body is not needed; the request said Connection: close
        return is_string($status) && preg_match('#^HTTP/\S+\s+(\d{3})#', $status, $m) === 1 ? (int) $m[1] : 0;
    }
}
