<?php
// The two value types App works with, so that it does not depend on a server API:
// router.php builds a Request from PHP's superglobals, worker.php from a PSR-7 request.

declare(strict_types=1);

namespace Ws2httpExample;

final class Request
{
    /** @var array<string,string> header names lower-cased */
    private array $headers = [];

    /**
     * @param array<string,mixed>             $query
     * @param array<string,string|list<string>> $headers any case
     * @param array<string,string>            $cookies
     */
    public function __construct(
        public readonly string $method,
        public readonly string $path,
        public readonly array $query,
        array $headers,
        public readonly string $body,
        public readonly array $cookies,
    ) {
        foreach ($headers as $name => $value) {
            $this->headers[strtolower((string) $name)] = is_array($value) ? implode(', ', $value) : (string) $value;
        }
    }

    /** The value of header $name (any case), or "" when absent. */
    public function header(string $name): string
    {
        return $this->headers[strtolower($name)] ?? '';
    }
}

final class Response
{
    /** @param array<string,string> $headers */
    public function __construct(
        public readonly int $status,
        public readonly string $body = '',
        public readonly array $headers = [],
    ) {
    }
}
