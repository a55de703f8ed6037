<?php
// Router script for PHP's built-in server:
//
//   WS2HTTP_PUSH_URL=http://127.0.0.1:7002/ php -S 127.0.0.1:8000 router.php
//
// Every request goes to App; it serves the demo page too.

declare(strict_types=1);

require __DIR__ . '/src/bootstrap.php';

use Ws2httpExample\App;
use Ws2httpExample\Request;

$path = (string) parse_url($_SERVER['REQUEST_URI'] ?? '/', PHP_URL_PATH);
$request = new Request(
    $_SERVER['REQUEST_METHOD'] ?? 'GET',
    $path === '' ? '/' : $path,
    $_GET,
    function_exists('getallheaders') ? getallheaders() : [],
    (string) file_get_contents('php://input'),
    $_COOKIE,
);

$response = App::fromEnv()->handle($request);

http_response_code($response->status);
foreach ($response->headers as $name => $value) {
    header($name . ': ' . $value);
}
echo $response->body;
